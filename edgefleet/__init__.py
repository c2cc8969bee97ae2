"""edgefleet: the ``edgefleet`` command that joins the parts' command-line apps."""

__version__ = "0.1.0"
