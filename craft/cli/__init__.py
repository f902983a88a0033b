"""The command line: ``craft COMMAND`` (a thin face over craft.stages.engine.engine)."""
