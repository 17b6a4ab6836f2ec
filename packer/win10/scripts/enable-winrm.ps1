# First logon: let Packer in over WinRM (HTTP, basic auth, local build network only).
$ErrorActionPreference = "Stop"
Get-NetConnectionProfile | Set-NetConnectionProfile -NetworkCategory Private
Enable-PSRemoting -Force -SkipNetworkProfileCheck
winrm set winrm/config/service '@{AllowUnencrypted="true"}'
winrm set winrm/config/service/auth '@{Basic="true"}'
Set-NetFirewallRule -Name WINRM-HTTP-In-TCP -RemoteAddress Any
Restart-Service WinRM
