"""`rebind why --reload PORT`: would closing an old generation's listener reset connections?"""

from __future__ import annotations


def run_reload_check(port: int, as_json: bool) -> int:
    from rebind.kernel.reload_facts import listeners, read_migrate_req
    from rebind.model.reload import advise, exit_status
    from rebind.render.reload import print_advice, to_json

    migrate_req = read_migrate_req()
    advice = advise(listeners(port), migrate_req, port)
    if as_json:
        from rebind.cli.render import dump_json

        dump_json(to_json(port, migrate_req, advice))
    else:
        print_advice(advice)
    return exit_status(advice)
