"""Prompts and grading: where prompts come from (sources.py), how they are put to the teacher and the student
(prompts.py), a completion as every generator returns it (generation.py), how answers are pulled out of a
completion (extract.py), how they are scored (verify.py), and rejection sampling over a teacher's samples
(rejection.py). Pure Python; the generate stage builds on these."""
