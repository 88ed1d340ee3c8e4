"""A run from config to run folder: checks at the boundary, the plan (every automatic choice resolved
once), the run itself, resume after a kill, run folders and scoring.
"""
