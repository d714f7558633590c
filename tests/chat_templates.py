"""Chat templates for the data tests, sized for the tiny character tokenizer ("|" ends a turn: it has no newline).

``GEN_TEMPLATE`` marks the assistant's tokens with {% generation %} blocks (transformers' assistant mask);
``PLAIN_TEMPLATE`` has none (assistant spans are found by templating prefixes)."""

GEN_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}A:{% generation %}{{ m['content'] }}{{ eos_token }}"
    "{% endgeneration %}|{% else %}{{ m['role'][0]|upper }}:{{ m['content'] }}|{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}A:{% endif %}"
)
PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'][0]|upper }}:{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}|{% endfor %}"
    "{% if add_generation_prompt %}A:{% endif %}"
)
