"""Measuring: speed against stock (bench), accuracy against dense (eval), corpora and tasks."""
