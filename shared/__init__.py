"""ReStNet core: split two pre-trained models into blocks, compare them with CKA, stitch, cost and catalog.

No network code lives here; `server/` and `client/` build the fleet on top of it.
"""
