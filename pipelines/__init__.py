"""Records, storage, preparation and the Ray Data ingest path. Imports no model or loss code."""
