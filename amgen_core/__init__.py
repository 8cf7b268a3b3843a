"""The bottom floor of amgen: label space, records, stable ids and seeds, image I/O, domains.

Everything else may import it; it imports nothing of amgen.
"""
