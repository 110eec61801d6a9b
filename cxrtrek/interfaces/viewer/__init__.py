"""The web viewer of readings: a page served by ``cxrtrek api`` at ``/`` (plain HTML, CSS and
JavaScript shipped in the package; nothing fetched from elsewhere), and the same page as one
self-contained HTML file of a finished run (``cxrtrek view``).

The page starts a reading from dropped images (and a prior) with an indication, or opens a
run from the list; follows its stages live over the API's server-sent events; draws the
boxes on the images (a colour per finding, toggled per finding, highlighted from their
answers, window and level); shows each stage's trace; approves or corrects a review pause;
and forks a run after a stage with a corrected answer, showing the downstream diff side by
side. It sends the API's bearer token (asked for in the page, or given as ``#token=...``).

:func:`mount_viewer` adds the page and its routes to the API's app; :func:`run_document` is
the JSON the page draws; :func:`export_html` embeds it in one file.
"""

from __future__ import annotations

from cxrtrek.interfaces.viewer.document import export_html, run_document, stages_from_trace
from cxrtrek.interfaces.viewer.routes import mount_viewer

__all__ = ["export_html", "mount_viewer", "run_document", "stages_from_trace"]
