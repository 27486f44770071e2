"""`infermesh drift`: the reference distributions the scoring service's drift monitor compares against."""
