"""Development tools of the course (not used by the notebooks): see each module's docstring."""
