"""reconstruct: person parsing, template fitting and the LHM-style reconstructor.

Arrives with the create and reconstructor issues; may import `render` and `deform`.
"""
