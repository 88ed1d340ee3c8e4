"""The package version, written into every run folder's `metadata.json`."""

__version__ = "0.2.0"
FOLDER_FORMAT = 2  # run folders of 0.1 have no metadata.json; see `kerastl.runfolder.load_model`
