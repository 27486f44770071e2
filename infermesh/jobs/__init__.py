"""`infermesh jobs`: submit, follow and cancel asynchronous bulk inference jobs (services/jobs)."""
