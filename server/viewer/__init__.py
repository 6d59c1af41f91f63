"""The λ viewer: a document's text with each TTT chunk shaded by its λ, as one HTML page.

``ponder.server.viewer.data`` runs a checkpoint over a document (the schedule's pass
and a SKIP pass) and returns an ``Inspection``: per chunk its text span, λ,
whether it was updated, and its cross-entropy with and without updates, plus
totals. ``ponder.server.viewer.page.render_html`` turns that into a self-contained
page. ``ponder inspect FILE`` (``read_text``, then ``inspect_tokens``; in ``ponder.cli``)
and the server's ``GET /ui?session_id=ID`` are thin front ends over the two.
"""
