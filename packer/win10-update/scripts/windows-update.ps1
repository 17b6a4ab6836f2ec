# Install every available Windows update through the Windows Update Agent COM API.
$ErrorActionPreference = "Stop"
$session = New-Object -ComObject Microsoft.Update.Session
$searcher = $session.CreateUpdateSearcher()
$found = $searcher.Search("IsInstalled=0 and Type='Software' and IsHidden=0").Updates
Write-Output "updates available: $($found.Count)"
if ($found.Count -eq 0) { exit 0 }
$updates = New-Object -ComObject Microsoft.Update.UpdateColl
foreach ($update in $found) {
  if (-not $update.EulaAccepted) { $update.AcceptEula() }
  [void]$updates.Add($update)
}
$downloader = $session.CreateUpdateDownloader()
$downloader.Updates = $updates
[void]$downloader.Download()
$installer = $session.CreateUpdateInstaller()
$installer.Updates = $updates
$result = $installer.Install()
Write-Output "install result: $($result.ResultCode), reboot required: $($result.RebootRequired)"
