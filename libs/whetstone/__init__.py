"""Whetstone: the shared contract and libraries every service imports."""
