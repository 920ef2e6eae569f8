"""geoopt's own optimizer tests (``test_adam.py``, ``test_rsgd.py`` of geoopt 0.5.1, vendored
unchanged with geoopt's Apache-2.0 license in ``LICENSE.geoopt``) run with manifold_opt's
optimizers: ``geoopt.optim.RiemannianAdam`` and ``geoopt.optim.RiemannianSGD`` are replaced
by ours with a plain assignment before the files are imported."""

import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import geoopt

import manifold_opt

geoopt.optim.RiemannianAdam = manifold_opt.RiemannianAdam
geoopt.optim.RiemannianSGD = manifold_opt.RiemannianSGD


def pytest_collection_modifyitems(items: list) -> None:
    # numpy 2 deprecates an __array_wrap__ signature torch tensors still use; geoopt's tests
    # compare tensors through np.testing, which triggers it (not a warning of ours)
    import pytest

    for item in items:
        item.add_marker(pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning"))
