"""The engine layer: the only code that touches Ray, DeepSpeed, MLflow and fsspec/S3."""
