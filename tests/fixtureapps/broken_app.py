"""An app that fails to import, as one with a dependency missing does."""

from no_such_dependency import make_app  # the import fails: that is the point


def main(global_config, **settings):
    return make_app(settings)
