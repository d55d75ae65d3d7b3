"""The training engine: the Trainer's loop (`trainer`), the step it repeats (`step`), where
training stands and how it resumes (`state`), and the builders that hand it its parts."""
