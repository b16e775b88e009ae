"""dicomflow pipeline stages, one module per DVC stage (see dvc.yaml), plus shared helpers."""
