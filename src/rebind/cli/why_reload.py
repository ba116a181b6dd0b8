"""`rebind why --reload PORT`: would closing an old generation's listener reset connections?"""

from __future__ import annotations


def run_reload_check(port: int, as_json: bool) -> int:
    from rebind.kernel.reload_facts import listeners, read_migrate_req
    from rebind.model.reload import Level, advise, exit_status
    from rebind.render.reload import text_lines, to_json

    migrate_req = read_migrate_req()
    advice = advise(listeners(port), migrate_req, port)
    if as_json:
        from rebind.cli.render import dump_json

        dump_json(to_json(port, migrate_req, advice))
        return exit_status(advice)
    from rebind.cli.render import out

    con = out()
    for level, line in text_lines(advice):
        if level is None:
            con.print(con.esc(line))
            continue
        style = "bold red" if level is Level.WARN else "bold green"
        head, _, rest = line.partition(" ")
        con.print(f"[{style}]{con.esc(head)}[/] {con.esc(rest)}")
    return exit_status(advice)
