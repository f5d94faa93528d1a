"""Test helper: an object whose unpickling would create a file — proof that a loader ran a pickle's code."""


class CreatesFile:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))
