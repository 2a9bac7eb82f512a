"""The bottom layer: enums, settings, webhook signatures and the outbound URL guard.

Nothing here imports another inferq folder; every other folder may import this one.
"""
