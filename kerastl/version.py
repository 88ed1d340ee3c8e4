"""The package version, written into every run folder's `metadata.json`."""

__version__ = "0.2.0"
FOLDER_FORMAT = 3  # 0.1 folders have no metadata.json, format 2 no "normalize"; see `kerastl.runfolder.load_model`
