"""The web UI's tabs (`app.py` puts them together): the shared generation form, the generation tabs, the
X/Y/Z plot, PNG info and History, the LoRA / embedding pickers and the Schedules tab."""
