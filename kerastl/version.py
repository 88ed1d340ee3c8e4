"""The package version, written into every run folder's `metadata.json`."""

__version__ = "0.3.0.dev0"
FOLDER_FORMAT = 3  # 0.1 folders have no metadata.json, format 2 no "normalize"; see `kerastl.runs.folder.load_model`
