"""The notebook surface: ``%lora`` / ``%%lora``. ``parse`` is pure; ``LoraMagics`` calls the public API."""
