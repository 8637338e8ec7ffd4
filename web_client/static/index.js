// Landing page: build the fragment-provisioned URLs from the form fields.
function fragment(params) {
  const usp = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v) usp.set(k, v);
  const s = usp.toString();
  return s ? "#" + s : "";
}

function update() {
  const token = document.getElementById("token").value.trim();
  const amount = document.getElementById("amount").value.trim();
  const order = document.getElementById("order").value.trim();
  document.getElementById("link-checkout").href = "/checkout" + fragment({ token, amount, order });
  document.getElementById("link-gate").href = "/gate" + fragment({ token });
  document.getElementById("link-enroll").href = "/enroll" + fragment({ token });
}

document.getElementById("form").addEventListener("input", update);
document.getElementById("form").addEventListener("submit", (ev) => ev.preventDefault());
update();
