"""geoopt's own optimizer tests (``test_adam.py``, ``test_rsgd.py`` of geoopt 0.5.1, vendored
unchanged with geoopt's Apache-2.0 license in ``LICENSE.geoopt``) run with manifold_opt's
optimizers: for each of these tests, ``geoopt.optim.RiemannianAdam`` and
``geoopt.optim.RiemannianSGD`` are replaced by ours with a plain assignment (undone after
the test, so that the cross-checks elsewhere still compare against geoopt's own)."""

import warnings

import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import geoopt

import manifold_opt


@pytest.fixture(autouse=True)
def our_optimizers_in_place_of_geoopts():
    saved = geoopt.optim.RiemannianAdam, geoopt.optim.RiemannianSGD
    geoopt.optim.RiemannianAdam = manifold_opt.RiemannianAdam
    geoopt.optim.RiemannianSGD = manifold_opt.RiemannianSGD
    yield
    geoopt.optim.RiemannianAdam, geoopt.optim.RiemannianSGD = saved


def pytest_collection_modifyitems(items: list) -> None:
    # numpy 2 deprecates an __array_wrap__ signature torch tensors still use; geoopt's tests
    # compare tensors through np.testing, which triggers it (not a warning of ours)
    for item in items:
        item.add_marker(pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning"))
