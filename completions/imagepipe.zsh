#compdef imagepipe

_imagepipe_completion() {
  eval $(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" _IMAGEPIPE_COMPLETE=complete_zsh imagepipe)
}

compdef _imagepipe_completion imagepipe