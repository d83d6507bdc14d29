"""The one exception type vlprune raises for bad user input."""


class VlpruneError(ValueError):
    """A bad value from the user: an unknown method, a budget or layer out of range, an unreadable image, ...

    The message names the bad value and what would be valid. The CLI turns it into exit status 2 without a traceback.
    """
