"""What the annotation page's server allows, and how it refuses: the bounds of a request (the server enforces them,
`/api/config` tells the page, which types none of them) and the error it answers with. One place: the server's
modules read them from here (`bounds.MAX_TILE`), so a test that sets other bounds sets them for every module.
"""

from http import HTTPStatus

MAX_TILE = 1024  # pixels a side of a served tile; larger: 400
MIN_TILE = 16
MAX_ZOOM = 20  # a tile at zoom z shows 2**z image pixels per tile pixel
MAX_BODY = 256 << 10  # bytes of a request body; larger: 413
MAX_PIXELS_PER_OP = 20_000  # pixels one add / remove may name; more: 413
MAX_LINE_VERTICES = 1000
MAX_EPOCHS = 1000  # of a training started from the page; more: 400
MAX_SUGGESTIONS = 200


def config():
    """The bounds as /api/config gives them to the page."""
    return {"max_tile": MAX_TILE, "max_zoom": MAX_ZOOM, "max_body": MAX_BODY, "max_epochs": MAX_EPOCHS,
            "max_suggestions": MAX_SUGGESTIONS, "max_line_vertices": MAX_LINE_VERTICES,
            "max_pixels_per_op": MAX_PIXELS_PER_OP}


class HTTPError(Exception):
    """An answer other than 200: `status` and a message the page shows."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def not_found(what="not found"):
    return HTTPError(HTTPStatus.NOT_FOUND, what)


def is_number(v):
    """A JSON number (int or float), not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)
