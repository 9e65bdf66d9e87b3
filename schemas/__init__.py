"""The checked-in TFDV schemas, installed as package data (fer_pipeline.schemas) and read
with importlib.resources, so an installed wheel finds them wherever it runs."""
