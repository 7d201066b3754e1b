"""What every stage runs: params (the schema), paths, errors and atomic files, the stage runner."""
