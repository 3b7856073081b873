"""The live web page: one static page (no build step, uPlot vendored) that every node serves at
``GET /`` and that ``gossipfl sim --live`` serves for a run in progress. Read-only: its endpoints
only report (`gossipfl.web.page`)."""

from gossipfl.web.history import History
from gossipfl.web.page import PageSource, page_response

__all__ = ["History", "PageSource", "page_response"]
