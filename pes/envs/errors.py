"""The error raised for environment input a user can get wrong."""


class EnvError(ValueError):
    """Bad environment input: an unknown id, an unsupported space, a missing dependency, a
    policy that does not fit. Its message is one line naming the problem."""
