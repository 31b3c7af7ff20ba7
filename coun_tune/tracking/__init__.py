"""MLflow: one experiment per search spec name, one parent run per search, one child run per
trial (nested through the `mlflow.parentRunId` tag). Only the driver writes to MLflow."""
