"""Entry file of the logged pyfunc model (MLflow "models from code": no pickled objects in the registry)."""

from mlflow.models import set_model

from fabric.tracking._pyfunc import FabricModel

set_model(FabricModel())
