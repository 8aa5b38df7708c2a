"""Infrastructure shared by every stage: storage, configuration, Ray, local services.

Imports nothing else of the project (see ARCHITECTURE.md, "Layers").
"""
