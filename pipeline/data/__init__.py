"""Prompts and grading: where prompts come from (sources.py), how answers are pulled out of a completion
(extract.py), and how they are scored (verify.py). Pure Python; the generate stage builds on these."""
