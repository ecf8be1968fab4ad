<!-- placeholder until the page is written -->
