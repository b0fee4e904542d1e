"""The stages: one module each (build, loop, report), run by `derl <stage>`."""
