"""Vector memory over chromadb: stage memory, prior studies, case library."""
