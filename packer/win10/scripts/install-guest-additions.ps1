# Install the VirtualBox Guest Additions from the ISO Packer attached (guest_additions_mode attach).
$ErrorActionPreference = "Stop"
$drive = Get-Volume | Where-Object { $_.FileSystemLabel -like "VBox_GAs*" } | Select-Object -First 1
if (-not $drive) { throw "the Guest Additions ISO is not attached" }
$root = "$($drive.DriveLetter):"
Get-ChildItem "$root\cert\vbox*.cer" | ForEach-Object {
  & "$root\cert\VBoxCertUtil.exe" add-trusted-publisher $_.FullName --root $_.FullName
}
Start-Process -Wait -FilePath "$root\VBoxWindowsAdditions.exe" -ArgumentList "/S"
