"""Prefect flows: they only wire tasks together, one flow per user job."""
