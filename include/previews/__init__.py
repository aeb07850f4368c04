"""What would go out, sending nothing (SPEC section 9): ``preview`` renders one email as delivery
would, ``send-test`` mails a proof that is never recorded, ``dry-run`` decides and renders a run
and reports it. All render through delivery's own path (:func:`include.delivery.run.delivery_renderer`)."""
