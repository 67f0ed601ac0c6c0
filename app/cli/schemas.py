"""`loopai schemas register`: schemas/*.avsc registered in the schema registry for the Avro wire format."""


import click

from app.cli.common import settings_of
from app.contract.registry import RegistryError, register_schemas
from app.contract.topics import topics_for


@click.group()
def schemas() -> None:
    """Schema registry: the subjects of the Avro wire format."""


@schemas.command("register")
@click.pass_context
def schemas_register(ctx: click.Context) -> None:
    """Register schemas/*.avsc under <topic>-value with BACKWARD compatibility (idempotent); an incompatible
    change is refused, naming the subject and the field."""
    settings = settings_of(ctx)
    try:
        registered = register_schemas(settings, topics_for(settings.topic_prefix))
    except RegistryError as exc:
        raise click.ClickException(str(exc)) from exc
    for subject, schema_id in registered.items():
        click.echo(f"{subject}: schema id {schema_id}")
