"""``explainrt batch``: explain a folder or Parquet files of images with Ray Data (the ``ray`` extra)."""
