"""Pipelines behind the CLI: render now; create, drive and finetune arrive with their issues."""
