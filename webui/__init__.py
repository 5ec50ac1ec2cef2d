"""stylelora's Gradio app (the library under stylelora/ never imports gradio)."""
