"""Ray roles, one file each, as thin Ray wrappers around plain classes that tests call without Ray.

Stages create these actors from inside their Ray task; nothing here is imported by the driver.
"""
